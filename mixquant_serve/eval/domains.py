"""The record kinds the suite's tool results hold: how keys and values look, and what the tools are called.

Each domain is a flat key -> value store an agent reads through a tool (settings of services, host
addresses, desk assignments, stock locations, parcel hubs). Keys are made of words rather than long
digit strings, so that finding a key in a long result is a matter of reading, not of telling apart
near-identical numbers. Word lists are fixed: the suite depends only on the seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WORDS = (
    "amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper", "kestrel",
    "lagoon", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "sable", "tundra", "umber", "violet",
    "willow", "yarrow", "zephyr", "acorn", "basil", "cedar", "dune", "fern", "glacier", "heron", "iris", "jasper",
    "koala", "lotus", "maple", "nova", "orchid", "pine", "quill", "reef", "sparrow", "thistle", "opal", "walnut",
)
SERVICES = (
    "billing", "smtp", "cache", "auth", "search", "upload", "report", "queue", "backup", "audit", "export",
    "invoice", "session", "metrics", "webhook", "gateway", "ledger", "payroll", "catalog", "notify",
)
SETTING_NAMES = (
    "retry_limit", "timeout_ms", "max_size", "region", "owner", "endpoint", "batch_size", "log_level", "pool",
    "mode", "window", "quota", "replicas", "ttl", "codec", "shard", "zone", "channel", "budget", "format", "priority",
    "backend", "cipher", "tier",
)
HOST_ROLES = ("api", "db", "cache", "web", "worker", "proxy", "search", "mail", "auth", "metrics", "queue", "ci")
REGIONS = ("west", "east", "north", "south", "central", "coast", "alpine", "delta")
FIRST_NAMES = (
    "Tom", "Anna", "Lena", "Omar", "Ravi", "Sofia", "Mark", "Elena", "Hugo", "Ines", "Jonas", "Maya", "Paul", "Rosa",
    "Yuki", "Zara", "Noah", "Clara", "Felix", "Iris", "Aaron", "Bianca", "Carlos", "Dara", "Emil", "Freya", "Goran",
    "Hana", "Ivan", "Julia",
)
LAST_NAMES = (
    "Baker", "Smith", "Novak", "Haddad", "Patel", "Rossi", "Klein", "Garcia", "Dubois", "Silva", "Berg", "Cohen",
    "Fischer", "Lopez", "Tanaka", "Okafor", "Moreau", "Ivanova", "Larsen", "Costa", "Meyer", "Nowak", "Sato",
    "Varga", "Weber", "Young", "Quinn", "Reyes", "Stone", "Torres",
)
MATERIALS = (
    "oak", "steel", "walnut", "glass", "copper", "linen", "bamboo", "marble", "cotton", "brass", "ceramic", "maple",
    "leather", "wool", "granite", "pine", "silver", "velvet", "cedar", "iron", "rattan", "slate", "teak", "zinc",
)
PRODUCTS = (
    "desk", "lamp", "kettle", "chair", "shelf", "mirror", "stool", "vase", "clock", "bench", "tray", "basket",
    "cabinet", "rug", "bowl", "frame", "table", "candle", "drawer", "mug", "pitcher", "lantern", "crate", "easel",
    "hook",
)
CITIES = (
    "Denver", "Lyon", "Osaka", "Porto", "Leeds", "Austin", "Bergen", "Graz", "Tampa", "Kyoto", "Quito", "Malmo",
    "Perth", "Split", "Turin", "Dakar", "Hanoi", "Lima", "Oslo", "Seville", "Riga", "Tunis", "Cork", "Brno",
)


@dataclass(frozen=True)
class Domain:
    """A key -> value store: vocabulary for questions, tool names, and generators of keys and values."""

    name: str
    system: str  # what the assistant is, first sentence of the system prompt
    collection: str  # top-level key of the tool result and plural noun, e.g. "settings"
    noun: str  # one record, e.g. "setting"
    value_noun: str  # what a record maps to, e.g. "value", "IP address"
    key_arg: str  # tool argument naming a record
    value_arg: str  # tool argument carrying a new value
    make_key: Callable[[random.Random], str]
    make_value: Callable[[random.Random], str]

    @property
    def list_tool(self) -> str:
        return f"list_{self.collection}"

    @property
    def get_tool(self) -> str:
        return f"get_{self.noun}"

    @property
    def delete_tool(self) -> str:
        return f"delete_{self.noun}"

    @property
    def update_tool(self) -> str:
        return f"update_{self.noun}"

    @property
    def history_tool(self) -> str:
        return f"get_{self.noun}_history"

    def tools(self) -> list[dict[str, Any]]:
        """The five tools of the domain, in the OpenAI declaration shape."""
        key = {self.key_arg: {"type": "string", "description": f"the {self.noun}"}}
        value = {self.value_arg: {"type": "string", "description": f"the new {self.value_noun}"}}
        query = {"query": {"type": "string", "description": "filter, or 'all'"}}
        return [
            _tool(self.list_tool, f"List {self.collection} with their {self.value_noun}.", query),
            _tool(self.get_tool, f"Read one {self.noun}.", key),
            _tool(self.delete_tool, f"Delete one {self.noun}.", key),
            _tool(self.update_tool, f"Set the {self.value_noun} of one {self.noun}.", {**key, **value}),
            _tool(self.history_tool, f"Show the change history of one {self.noun}.", key),
        ]


def _tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(properties)},
        },
    }


def _setting_key(rng: random.Random) -> str:
    return f"{rng.choice(SERVICES)}.{rng.choice(SETTING_NAMES)}"


def _setting_value(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}-{rng.randint(10, 99)}"


def _host_key(rng: random.Random) -> str:
    return f"{rng.choice(HOST_ROLES)}-{rng.choice(REGIONS)}-{rng.randint(1, 9)}"


def _host_value(rng: random.Random) -> str:
    return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def _person_key(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _desk_value(rng: random.Random) -> str:
    return f"{rng.choice('ABCDEFGH')}-{rng.randint(100, 699)}"


def _product_key(rng: random.Random) -> str:
    return f"{rng.choice(MATERIALS)} {rng.choice(PRODUCTS)}"


def _bin_value(rng: random.Random) -> str:
    return f"{rng.choice('KLMNPRST')}{rng.randint(10, 99)}-{rng.randint(1, 9)}"


def _parcel_key(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"


def _hub_value(rng: random.Random) -> str:
    return f"{rng.choice(CITIES)} hub {rng.randint(1, 99)}"


DOMAINS: tuple[Domain, ...] = (
    Domain("settings", "You are the configuration assistant of an operations team.", "settings", "setting", "value",
           "key", "value", _setting_key, _setting_value),
    Domain("hosts", "You are the network inventory assistant of a data center.", "hosts", "host", "IP address",
           "host", "ip", _host_key, _host_value),
    Domain("desks", "You are the office assistant who manages desk assignments.", "employees", "employee", "desk",
           "employee", "desk", _person_key, _desk_value),
    Domain("inventory", "You are the warehouse assistant who tracks where stock is kept.", "products", "product",
           "bin", "product", "bin", _product_key, _bin_value),
    Domain("parcels", "You are the logistics assistant who tracks parcels.", "parcels", "parcel", "hub", "parcel",
           "hub", _parcel_key, _hub_value),
)
