"""What trials read: models (models.py), text corpora (corpora.py), and the verified,
lock-protected folder cache both are prepared into (cache.py)."""
