"""The digital twin. It replaces the hardware, not the drivers: the world model and the
MCU and filter-wheel emulators run in their own "hardware" process and speak the real
serial protocols over pseudo-terminals; stand-ins for the RPi.GPIO module and for
picamera2 live in the controller's process and learn the world's state from it."""
