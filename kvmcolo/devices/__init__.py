"""Layer 2 devices.  Each device is one small module that knows nothing of
COLO: it exposes io_read/io_write to the bus and, where it has state worth
keeping, save_state()/load_state() for checkpoints."""
