"""Pure routing decisions for the speech gateway: which replica serves a request.

Functions of observed state and `now`, no I/O (the gateway feeds them what it sees):
- `balance.choose`: power-of-two choices on outstanding work (queued characters), with
  session affinity by rendezvous hashing under a load bound;
- `outliers`: ejection on consecutive failures and timeouts, re-admission after an
  exponentially growing time, never ejecting more than a share of the fleet.
"""
