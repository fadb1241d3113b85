"""recipes/lm"""
