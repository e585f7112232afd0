"""Serving past one process: N engine replicas behind Ray Serve (`python -m engine.serve.ray`).

Ray is an optional extra (`pip install -e .[ray]`): importing this package, `.routing` (the
routing policy, pure Python) or `.metrics` never imports Ray; `.ray`, `.replica`, `.ingress` and
`.router` do.
"""
