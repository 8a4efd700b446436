"""Who pays for an autograd graph's nodes: the session's stored tensors, each node charged to one of them.

Autograd keeps a graph's nodes (about 550 bytes each, beside what they save) alive for as long as some
tensor leads to them, whatever object ids were deleted on the way: a model of 1,800 chained adds,
called again and again on its own output with the older outputs deleted, kept a million nodes alive
under one object (607 MiB under a 16 MiB quota), when only what the nodes saved was charged.

So each stored tensor with a graph is charged the nodes its own command made, and when it is deleted
while stored tensors computed from it live on, its nodes pass to one of them (they are still alive,
through it). Each node is charged once, to one holder, so a residual computation (``h = h + f(h)``)
costs its real size: charging every output the sum of its inputs' graphs counted shared history once per
path, exponentially. The count is an upper bound after a ``backward`` frees a graph (the nodes stay
charged until their holders go) and for several outputs of one op (each charged the op's nodes).
"""

from __future__ import annotations

from collections.abc import Iterable


class GraphLedger:
    """The nodes charged to each stored tensor with an autograd graph, and which of them were computed from
    which (by object id)."""

    def __init__(self) -> None:
        #: object id -> the nodes charged to it
        self.nodes: dict[int, int] = {}
        self._parents: dict[int, set[int]] = {}
        self._children: dict[int, set[int]] = {}

    def add(self, obj_id: int, made: int, inputs: Iterable[int]) -> None:
        """``obj_id`` was made with ``made`` nodes from the stored tensors ``inputs``."""
        self.nodes[obj_id] = made
        parents = {p for p in inputs if p in self.nodes and p != obj_id}
        if parents:
            self._parents[obj_id] = parents
            for parent in parents:
                self._children.setdefault(parent, set()).add(obj_id)

    def remove(self, obj_id: int) -> int | None:
        """Forget ``obj_id``; returns the stored tensor its nodes passed to (``nodes`` has its new count),
        or None when no stored tensor computed from it is left (its nodes go with it)."""
        nodes = self.nodes.pop(obj_id, None)
        if nodes is None:
            return None
        parents = self._parents.pop(obj_id, set())
        for parent in parents:
            self._unlink(parent, obj_id)
        children = self._children.pop(obj_id, set())
        for child in children:  # its children now descend from its parents directly
            linked = self._parents.setdefault(child, set())
            linked.discard(obj_id)
            linked |= parents
            for parent in parents:
                self._children.setdefault(parent, set()).add(child)
        if not children:
            return None
        heir = min(children)
        self.nodes[heir] += nodes
        return heir

    def _unlink(self, parent: int, child: int) -> None:
        children = self._children.get(parent)
        if children is not None:
            children.discard(child)
            if not children:
                del self._children[parent]

    def clear(self) -> None:
        self.nodes.clear()
        self._parents.clear()
        self._children.clear()


__all__ = ["GraphLedger"]
