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

**Leaves.** A graph also keeps its leaves alive (``AccumulateGrad`` holds each: a model's parameters, a
tensor that requires a gradient), and with them the gradients a backward puts on them, whatever object
ids were deleted: a red team stored one call's 4-byte output per 64 MiB model it then deleted, and held
1.5 GiB under a 256 MiB quota. The rule: **every stored tensor whose graph reaches a leaf is a holder of
that leaf's storage and of the room for its gradient** (the quota's ``gradient_key``), beside the leaf's
own object (or its model). The quota charges each storage and each room once, however many hold it, and
uncharges it with its last holder: so while the model or the leaf lives they are not charged again, and
when it is deleted its weights and gradients stay charged until the last stored tensor that leads to
them goes (then autograd frees them too). Graphs also pay, once per leaf, for the leaf's own objects
(``GRAPH_LEAF_BYTES``), and for each set's bookkeeping (``LEAF_SET_BYTES``). A ``backward`` frees what
the graph saved, not its nodes: the leaves, and the gradients it made on them, live on as long as the
output does, and stay charged to it. The room is charged from the start, as a leaf's own object is
charged for it, so a later backward adds nothing.

Holders are shared by ``LeafSet``: the leaves an output's graph reaches that its stored inputs' graphs
do not, and (by reference) those inputs' sets. Finding them walks only the command's own nodes, stopping
at the grad_fns of stored tensors (whose sets are known) and at leaves: an op costs its own nodes, not
its history, and an op that reaches no new leaf shares its input's set (a chain of a million adds keeps
one set); an op that adds a leaf makes a set of that leaf alone, which keeps its input's set. An op
that needs no gradient makes no graph and never gets here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .quota import Quota
from .taint import storage_key

#: the node that accumulates a leaf's gradient (its ``variable`` is the leaf)
_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad  # type: ignore[attr-defined]
#: what a leaf a graph keeps alive takes beside its storage and its gradient: its tensor and its
#: ``AccumulateGrad`` node (1.3 KB measured for a 1-element leaf) and its keys in the quota. Charged once
#: per leaf, to the sets that hold it (a chain of adds of a new 1-element leaf each, the leaves deleted,
#: kept 2.9 KB per add alive)
GRAPH_LEAF_BYTES = 1536
#: what a ``LeafSet``'s own bookkeeping takes (about 1 KB measured, with one leaf)
LEAF_SET_BYTES = 1024


def leaf_key(leaf: torch.Tensor) -> tuple[str, int, int]:
    """The quota key of what a leaf kept by a graph takes beside its storage and gradient: one per leaf."""
    return ("leaf", storage_key(leaf.untyped_storage()), int(leaf.storage_offset()))


class LeafSet:
    """A quota holder of leaves a graph reaches (their storages and their gradients' room), shared by the
    stored tensors whose graphs reach exactly them. ``parents``: the sets of the stored tensors the graph
    was computed from, kept (one use each) as long as this set is."""

    __slots__ = ("leaves", "keys", "parents", "users", "anchor")

    def __init__(self, leaves: tuple[torch.Tensor, ...], parents: tuple["LeafSet", ...], anchor: Any = None) -> None:
        #: the leaves this set holds itself, until it is held (then None: the quota keeps their keys, and
        #: the set never keeps a leaf alive, the graph does)
        self.leaves: tuple[torch.Tensor, ...] | None = leaves
        #: their ``leaf_key``s: an op reaching only leaves its one stored input's set holds itself (``h = h + w``
        #: in a loop) shares that set
        self.keys = frozenset(leaf_key(t) for t in leaves)
        self.parents = parents
        #: the stored tensors and the sets that use this one
        self.users = 0
        #: the ``AccumulateGrad`` node of a set of one leaf and nothing else (every op on a stored leaf
        #: shares it)
        self.anchor = anchor


class GraphLedger:
    """The nodes charged to each stored tensor with an autograd graph, and which of them were computed from
    which (by object id)."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        #: object id -> the nodes charged to it
        self.nodes: dict[int, int] = {}
        self._parents: dict[int, set[int]] = {}
        self._children: dict[int, set[int]] = {}
        #: object id -> its tensor's grad_fn and the set of leaves its graph reaches
        self._leaves: dict[int, tuple[Any, LeafSet | None]] = {}
        #: the grad_fn of stored tensors -> [their leaf set, how many stored tensors have that grad_fn]
        self._known: dict[Any, list[Any]] = {}
        #: a leaf's ``AccumulateGrad`` -> the held set of that leaf alone
        self._alone: dict[Any, LeafSet] = {}

    def leaves_of(self, tensor: torch.Tensor) -> LeafSet | None:
        """The leaf set of ``tensor``, about to be stored: the set of a stored tensor with its grad_fn (a
        sibling output), of its one stored input when it reaches no new leaf, or a new set (not held
        yet: ``add`` holds it) of the leaves it reaches first and the sets of the stored inputs it
        reaches. Walks the graph from ``tensor`` to the grad_fns of stored tensors and to leaves."""
        root: Any = tensor.grad_fn
        known = self._known.get(root)
        if known is not None:
            return known[0]
        leaves: dict[int, torch.Tensor] = {}
        parents: dict[int, LeafSet] = {}
        accumulator = None
        seen, stack = {root}, [root]
        while stack:
            node: Any
            for node, _ in stack.pop().next_functions:
                if node is None or node in seen:
                    continue
                seen.add(node)
                known = self._known.get(node)
                if known is not None:
                    if known[0] is not None:
                        parents[id(known[0])] = known[0]
                elif type(node) is _ACCUMULATE_GRAD:
                    leaf = node.variable
                    if leaf.layout == torch.strided:  # (a sparse leaf has no one storage: not charged)
                        leaves[id(leaf)] = leaf
                        accumulator = node
                else:
                    stack.append(node)
        if not leaves and len(parents) <= 1:
            return next(iter(parents.values()), None)
        if len(parents) == 1:  # leaves its one input's set holds already (the same weight, step after step)
            parent = next(iter(parents.values()))
            if parent is not None and all(leaf_key(t) in parent.keys for t in leaves.values()):
                return parent
        if len(leaves) == 1 and not parents:  # an op on a stored leaf (and constants)
            alone = self._alone.get(accumulator)
            return alone if alone is not None else LeafSet(tuple(leaves.values()), (), accumulator)
        return LeafSet(tuple(leaves.values()), tuple(parents.values()))

    def new_bytes(self, leaves: LeafSet | None) -> int:
        """What holding ``leaves`` (from ``leaves_of``) would add to the quota: nothing for a set already
        held; for a new one, its bookkeeping and what of its leaves no holder holds yet."""
        if leaves is None or leaves.leaves is None:
            return 0
        own = leaves.leaves
        return LEAF_SET_BYTES + self.quota.new_bytes(list(own), own, [(leaf_key(t), GRAPH_LEAF_BYTES) for t in own])

    def add(self, obj_id: int, made: int, inputs: Iterable[int], tensor: torch.Tensor | None = None,
            leaves: LeafSet | None = None) -> None:
        """``obj_id`` was made with ``made`` nodes from the stored tensors ``inputs``; ``tensor``, its value,
        reaches ``leaves`` (``leaves_of``), which it now holds."""
        if tensor is not None:
            if leaves is not None:
                if leaves.users == 0 and leaves.leaves is not None:  # a new set: held now
                    own = leaves.leaves
                    self.quota.hold(leaves, list(own), LEAF_SET_BYTES, own,
                                    [(leaf_key(t), GRAPH_LEAF_BYTES) for t in own])
                    leaves.leaves = None
                    for upstream in leaves.parents:
                        upstream.users += 1
                    if leaves.anchor is not None:
                        self._alone[leaves.anchor] = leaves
                leaves.users += 1
            root = tensor.grad_fn
            self._leaves[obj_id] = (root, leaves)
            known = self._known.get(root)
            if known is None:
                self._known[root] = [leaves, 1]
            else:
                known[1] += 1
        self.nodes[obj_id] = made
        parents = {p for p in inputs if p in self.nodes and p != obj_id}
        if parents:
            self._parents[obj_id] = parents
            for parent in parents:
                self._children.setdefault(parent, set()).add(obj_id)

    def remove(self, obj_id: int) -> int | None:
        """Forget ``obj_id``; returns the stored tensor its nodes passed to (``nodes`` has its new count),
        or None when no stored tensor computed from it is left (its nodes go with it)."""
        entry = self._leaves.pop(obj_id, None)
        if entry is not None:
            root, leaves = entry
            known = self._known.get(root)
            if known is not None:
                known[1] -= 1
                if known[1] == 0:
                    self._known.pop(root, None)  # (a session's clear may have emptied it meanwhile)
            if leaves is not None:
                self._release(leaves)
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

    def _release(self, leaves: LeafSet) -> None:
        """One use of ``leaves`` is gone: with its last, uncharge what it holds alone, and release its
        parents (a loop, not recursion: a chain of sets can be a million long)."""
        stack = [leaves]
        while stack:
            current = stack.pop()
            current.users -= 1
            if current.users == 0:
                self.quota.drop(current)
                stack.extend(current.parents)
                current.parents = ()
                if current.anchor is not None:
                    self._alone.pop(current.anchor, None)
                    current.anchor = None

    def leaf_sets(self) -> int:
        """How many leaf sets are held (for tests and status)."""
        found, stack = set(), [leaves for _, leaves in self._leaves.values() if leaves is not None]
        while stack:
            current = stack.pop()
            if id(current) not in found:
                found.add(id(current))
                stack.extend(current.parents)
        return len(found)

    def clear(self) -> None:
        self._leaves.clear()
        self._known.clear()
        self._alone.clear()
        self.nodes.clear()
        self._parents.clear()
        self._children.clear()


__all__ = ["GRAPH_LEAF_BYTES", "LEAF_SET_BYTES", "GraphLedger", "LeafSet", "leaf_key"]
