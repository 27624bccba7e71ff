"""Telemetry: tag names, the statistics (plain tensor math), the Lightning callback and the step recorder."""
