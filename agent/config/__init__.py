"""fastpath's configuration: every key with its type, default and bounds
(schema.py, the single source of defaults), and Terway's eni-config as a
source of overrides (eniconfig.py). Pure: no kernel, no cluster access."""
from agent.config.schema import (KEYS, KEYS_BY_NAME, NODE_IP, Config, ConfigError, coerce, describe,
                                 field_names, grpc_socket_path, load, parse_address,
                                 readme_rows, show)

__all__ = ["KEYS", "KEYS_BY_NAME", "NODE_IP", "Config", "ConfigError", "coerce", "describe",
           "field_names", "grpc_socket_path", "load", "parse_address", "readme_rows", "show"]
