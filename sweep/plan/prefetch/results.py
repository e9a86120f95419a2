"""What a prefetch did, per item and per node, and how it is printed."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

NEW = ("fetched", "built", "ready")
PLANNED = ("would fetch", "would build", "would load")


@dataclass
class ItemResult:
    kind: str  # model | calibration | evaluation | tasks
    name: str
    status: str  # fetched built ready cached local | would fetch/build/load | failed skipped
    bytes: int = 0  # new on disk for fetched/built, else what is there
    seconds: float = 0.0
    detail: str = ""
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass
class NodeResult:
    host: str
    node_id: str | None = None
    address: str | None = None
    hub_cache: str | None = None
    trial_cache: str | None = None
    seconds: float = 0.0
    dry_run: bool = False
    items: list[ItemResult] = field(default_factory=list)
    error: str | None = None  # the node's task itself failed (a lost node, an exception outside an item)

    @property
    def failures(self) -> list[ItemResult]:
        return [i for i in self.items if i.failed]

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}

    @classmethod
    def from_dict(cls, data: dict) -> NodeResult:
        data = {k: v for k, v in data.items() if k != "ok"}
        items = [ItemResult(**i) for i in data.pop("items", [])]
        return cls(**data, items=items)

    def describe(self) -> str:
        tags = [t for t in (self.address if self.address != self.host else None,
                            self.node_id[:8] if self.node_id else None) if t]
        where = self.host + (f" ({', '.join(tags)})" if tags else "")
        if self.error:
            return f"node {where}: failed: {self.error}"
        counts = _counts(self.items)
        new = sum(i.bytes for i in self.items if i.status in NEW)
        words = "would fetch or build" if self.dry_run else "new"
        return (f"node {where}: {counts['new']} {words} ({format_bytes(new)}), {counts['cached']} cached, "
                f"{counts['local']} local, {counts['failed']} failed, {counts['skipped']} skipped in "
                f"{self.seconds:.1f} s")


def _counts(items: list[ItemResult]) -> dict[str, int]:
    out = {"new": 0, "cached": 0, "local": 0, "failed": 0, "skipped": 0}
    for item in items:
        if item.status in NEW or item.status in PLANNED:
            out["new"] += 1
        elif item.status in out:
            out[item.status] += 1
    return out


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_item(item: ItemResult) -> str:
    line = f"  {item.kind:<11} {item.name:<44} {item.status:<11} {format_bytes(item.bytes):>10} {item.seconds:>7.1f} s"
    if item.error:
        return f"{line}  {item.error}"
    return f"{line}  {item.detail}" if item.detail else line


def format_summary(node: NodeResult) -> str:
    lines = [f"summary ({node.host}{', dry run' if node.dry_run else ''}):",
             f"  {'kind':<11} {'items':>5} {'new':>5} {'cached':>6} {'local':>5} {'failed':>6} {'skipped':>7} "
             f"{'size':>10} {'time':>9}"]
    kinds = [k for k in ("model", "calibration", "evaluation", "tasks", "cache") if any(i.kind == k for i in node.items)]
    for kind in [*kinds, "total"]:
        items = node.items if kind == "total" else [i for i in node.items if i.kind == kind]
        c = _counts(items)
        size = sum(i.bytes for i in items)
        seconds = node.seconds if kind == "total" else sum(i.seconds for i in items)
        lines.append(f"  {kind:<11} {len(items):>5} {c['new']:>5} {c['cached']:>6} {c['local']:>5} {c['failed']:>6} "
                     f"{c['skipped']:>7} {format_bytes(size):>10} {seconds:>7.1f} s")
    lines.append(f"  hub cache: {node.hub_cache or '-'};  trial cache: {node.trial_cache or '-'}")
    return "\n".join(lines)
