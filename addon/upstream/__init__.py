"""Talking to the endpoints: one attempt at one endpoint (`client`), the loop that tries them in
turn until one gives an answer worth sending (`failover`), and the answers the proxy gives
itself where no endpoint serves a request (`gateway`).
"""
