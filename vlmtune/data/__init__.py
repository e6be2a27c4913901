"""Data: sources (file, folder, Hub id) -> rows -> Conversations (``formats``), media decoding (``media``),
the lazy dataset and resumable sampler (``dataset``), synthetic demo receipts (``synthetic``).

data/ knows nothing of tokens: it yields Conversations; vlmtune/encode.py turns them into ids and labels.
"""
