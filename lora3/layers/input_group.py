"""One thin product for the LoRA layers that read the same input.

A transformer block feeds one tensor to several adapted projections: q, k and v
of an attention layer, gate and up of a gated FFN. Each LoRA layer alone computes
`x @ A_i` (and, backward, `dh_i @ A_i^T` and `x^T @ dh_i`): three rank-r matmuls
per layer, each too thin to keep a CPU core busy, so on XLA's CPU backend they
cost far more than their FLOPs. An `InputGroup` computes `x @ [A_1 | A_2 | ...]`
once, when the first of its layers sees `x`, and hands each layer its columns; the
gradients of the concatenated product are one matmul each as well. The result is
the same sums (floating-point rounding aside), so the numerics tests hold.

Scope and safety. A cached product is reused only
- within one outermost Keras call (one forward pass: no weight changes inside it),
- by a layer given *the same tensor object* the product was computed from, and
- once per layer.
Anything else (another input, a layer with LoRA dropout, a merged layer) takes
the layer's own path, so grouping can only save work, never change a result.

Surgery (`lora3.surgery.apply_plan`) forms the groups: the unmerged wrappers that
share a parent layer and a flat input width.
"""

from keras import ops


def _call_context(layer):
    """The Keras call context of the current outermost call (None outside a call)."""
    try:
        return layer._get_call_context()
    except Exception:  # a Keras without call contexts: no grouping, every layer alone
        return None


class InputGroup:
    """LoRA layers of one parent that may be called on the same input."""

    def __init__(self, members):
        self.members = list(members)
        self.hits = 0  # trace-time count of products served from the group (for tests)
        # After one whole pass: member id -> ids that took columns of its product. Later
        # products include only those (a cross-attention query does not compute A_k, A_v
        # columns on the decoder's input that only the encoder's input would use).
        self._partners = {}
        self._entries = []
        self._reset(None)

    def _reset(self, ctx):
        for _, _, _, owner, taken in self._entries:
            self._partners[owner] = taken
        self._ctx = ctx
        self._entries = []  # [(x, hidden, {member id: (start, stop)}, owner id, {ids served})]
        self._served = set()

    @staticmethod
    def eligible(member):
        return member.built and not member.merged and member.lora_dropout is None

    def hidden(self, member, x, x2):
        """`s * x2 @ A` for `member` (x2 is `x` on its 2-D view), or None to compute it alone."""
        if not self.eligible(member):
            return None
        ctx = _call_context(member)
        if ctx is None:
            return None
        if ctx is not self._ctx:  # a new forward pass: forget the last one's products
            self._reset(ctx)
        for seen_x, hidden, columns, _, taken in self._entries:
            if seen_x is x and id(member) in columns:
                start, stop = columns.pop(id(member))
                taken.add(id(member))
                self._served.add(id(member))
                self.hits += 1
                return hidden[:, start:stop]
        self._served.add(id(member))
        partners = self._partners.get(id(member))
        todo = [member] + [
            m for m in self.members
            if m is not member and id(m) not in self._served and self.eligible(m)
            and (partners is None or id(m) in partners)
        ]
        if len(todo) == 1:
            return None
        scalings = {m.scaling for m in todo}
        if len(scalings) == 1:
            a = ops.concatenate([m.lora_A for m in todo], axis=1)
            hidden = ops.multiply(ops.matmul(x2, a), ops.cast(scalings.pop(), x2.dtype))
        else:
            a = ops.concatenate([ops.multiply(m.lora_A, m.scaling) for m in todo], axis=1)
            hidden = ops.matmul(x2, a)
        columns, start = {}, member.rank
        for m in todo[1:]:
            columns[id(m)] = (start, start + m.rank)
            start += m.rank
        self._entries.append((x, hidden, columns, id(member), set()))
        return hidden[:, : member.rank]
