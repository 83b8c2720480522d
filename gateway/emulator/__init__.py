"""A provider emulator: many LLM accounts (OpenAI and Anthropic wire formats) behind one
server, each with its own exact-prefix prompt cache, rate limits, latency and faults."""

from gateway.emulator.config import (
    AccountSpec,
    EmulatorConfig,
    FaultSpec,
    LatencySpec,
    LimitSpec,
    default_config,
    load_config,
)
from gateway.emulator.server import EmulatorServer, add_arguments, create_app, main

__all__ = [
    "AccountSpec",
    "EmulatorConfig",
    "EmulatorServer",
    "FaultSpec",
    "LatencySpec",
    "LimitSpec",
    "add_arguments",
    "create_app",
    "default_config",
    "load_config",
    "main",
]
