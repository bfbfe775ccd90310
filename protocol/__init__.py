"""vfio-user wire protocol, sans-IO (see protocol/connection.py for the theory of operation)."""
