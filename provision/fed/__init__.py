"""Federated fine-tuning on the fleet (`claw fed`): the controller side."""
