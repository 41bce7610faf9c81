"""The map: FAISS index, map directory store, map building, loop-closure detection."""
