"""What the proxy knows of its endpoints and decides from it: their health and cooldowns
(`endpoints`), their usage windows (`limits`), the rules of retrying and failing over
(`policy`), which endpoint a request goes to first (`routing`), and what a successor
takes over on a restart (`carry`).
"""
