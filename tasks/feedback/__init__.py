"""The learning loop: merchant reviews in, preference pairs and datasets built, candidates trained."""
