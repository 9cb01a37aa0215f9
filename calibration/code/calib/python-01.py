"""Small inventory tracker built on dataclasses.

The tracker keeps stock levels per SKU, records every movement, and can
report which items have fallen below their reorder point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, List, Optional


@dataclass
class Item:
    sku: str
    name: str
    unit_price: float
    quantity: int = 0
    reorder_point: int = 5

    @property
    def stock_value(self) -> float:
        """Value of the units currently on the shelf."""
        return round(self.quantity * self.unit_price, 2)


@dataclass(frozen=True)
class Movement:
    sku: str
    delta: int
    reason: str
    at: datetime = field(default_factory=datetime.now)


class InsufficientStock(Exception):
    """Raised when a removal would push stock below zero."""


class Inventory:
    def __init__(self) -> None:
        self._items: Dict[str, Item] = {}
        self._log: List[Movement] = []

    def add_item(self, item: Item) -> None:
        if item.sku in self._items:
            raise ValueError(f"duplicate SKU: {item.sku}")
        self._items[item.sku] = item

    def get(self, sku: str) -> Optional[Item]:
        return self._items.get(sku)

    def receive(self, sku: str, count: int, reason: str = "delivery") -> None:
        if count <= 0:
            raise ValueError("count must be positive")
        self._items[sku].quantity += count
        self._log.append(Movement(sku, count, reason))

    def remove(self, sku: str, count: int, reason: str = "sale") -> None:
        item = self._items[sku]
        if count > item.quantity:
            raise InsufficientStock(
                f"{sku}: wanted {count}, only {item.quantity} left"
            )
        item.quantity -= count
        self._log.append(Movement(sku, -count, reason))

    def needs_reorder(self) -> List[Item]:
        """Items at or below their reorder point, lowest stock first."""
        low = [i for i in self._items.values() if i.quantity <= i.reorder_point]
        return sorted(low, key=lambda i: (i.quantity, i.sku))

    def total_value(self) -> float:
        return round(sum(i.stock_value for i in self._items.values()), 2)

    def history(self, sku: str) -> List[Movement]:
        return [m for m in self._log if m.sku == sku]


if __name__ == "__main__":
    inv = Inventory()
    inv.add_item(Item("BOLT-M6", "M6 hex bolt", 0.12, reorder_point=200))
    inv.add_item(Item("NUT-M6", "M6 nut", 0.05, reorder_point=200))
    inv.add_item(Item("WASH-M6", "M6 washer", 0.02, reorder_point=100))
    inv.receive("BOLT-M6", 500)
    inv.receive("NUT-M6", 150)
    inv.remove("BOLT-M6", 320)
    for item in inv.needs_reorder():
        print(f"reorder {item.sku:<8} have {item.quantity:>4}")
    print(f"stock value: {inv.total_value():.2f}")
