"""Federated fine-tuning on the controller side: runs, exporting their adapters, the fleet."""
