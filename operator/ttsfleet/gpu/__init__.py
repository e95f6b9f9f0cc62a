"""GPU knowledge: the catalogue of products and MIG profiles (pure data)."""
