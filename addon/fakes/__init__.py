"""Fake upstreams for the tests, the demo and the benchmark: Anthropic's API (`anthropic`),
Bedrock, Mantle and Vertex AI (`cloud`, which needs botocore), an OpenAI-format API
(`openai`), all on one small HTTP server (`server`). Nothing of the proxy imports them.
"""
