"""Framework adapters, installed as ``sharded_broker.integrations``.

The engine (``sharded_broker``) never imports Celery, kombu or Dramatiq; the modules here
translate between a framework's broker contract and the engine's API.
"""
