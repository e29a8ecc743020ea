"""Getting a chosen answer to the client: through the loopback bridge (`bridge`) or straight
into mitmproxy's connection (`direct`), continued on another endpoint when it breaks
(`resume`), shown readable in mitmweb (`sseview`); and what a request meets before that (a
body over the limit, `bodylimit`; a client that leaves, `departures`; a refusal, `admission`).
"""
