"""Several processes as one proxy: worker processes on one port (`workers`), the supervisor's
store (`hub`) and the RESP client that talks to it (`resp_client`), and the state they, or a
fleet's Redis, share (`shared_state`); and a process's hand-over of its port to a successor
(`handover`, `listener`).
"""
