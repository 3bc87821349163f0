"""TorchX launch components for torchrec_cce (see ``launch/components.py``)."""
