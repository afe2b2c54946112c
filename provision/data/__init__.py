"""Data shipped with the controller: device profiles and the doctor's knowledge base."""
