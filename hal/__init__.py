"""Hardware abstraction layer: one interface per device kind, the frame type and the
project's error hierarchy. Drivers (real) and the simulator both implement these; the
controller depends only on this package."""
