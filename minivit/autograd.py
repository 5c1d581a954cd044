"""The graph walk: reverse-mode differentiation, first order and higher.

Every Tensor computed by an op remembers that op (``tensor._ctx``), and the op remembers its inputs
(``op.parents``). Back-propagation visits the tensors from the outputs back to the leaves, each after every tensor
that used it, and at each one does three things:

    walk        take the gradient that has flowed into the tensor (the sum over all of its uses)
    call        hand it to the op that made the tensor, which returns the gradient of each of its inputs
    accumulate  add each of those into the gradient of that input

Two entry points share that one walk:

    Tensor.backward(grad)              adds the gradients into ``.grad`` of the leaves (the parameters)
    grad(outputs, inputs, grad_outputs) returns the gradients of ``inputs`` and touches no ``.grad``

With ``create_graph=True`` every op is called through its ``backward_graph``: the gradients come out as Tensors
with a graph of their own, so that they can be differentiated again (a gradient penalty, a Hessian-vector
product). Without it, every op runs its fast ``backward`` on raw arrays and no graph is built.
"""

from minivit.function import run_with_hooks
from minivit.tensor import Tensor, _as_array, set_grad_enabled


def backward(output, grad=None, retain_graph=None, create_graph=False):
    """Back-propagate from ``output`` and add the gradients into ``.grad`` of the leaves (see Tensor.backward)."""
    _check_outputs([output])
    grads = _walk([output], [_seed(output, grad, create_graph, "grad")], targets=None,
                  retain_graph=create_graph if retain_graph is None else retain_graph, create_graph=create_graph)
    for tensor, g in grads:
        _accumulate_into(tensor, g)


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, allow_unused=False):
    """The gradients of ``outputs`` with respect to ``inputs``, as ``torch.autograd.grad``.

    Args:
        outputs: a Tensor or a sequence of Tensors.
        inputs: a Tensor or a sequence of Tensors (leaves or intermediate tensors) that require grad.
        grad_outputs: the upstream gradient of each output (arrays or Tensors of the outputs' shapes); may be
            None for one-element outputs (a gradient of 1).
        retain_graph: keep the graph for another walk; defaults to ``create_graph``.
        create_graph: build a graph of the gradients, so that they can be differentiated again.
        allow_unused: return None for an input that the outputs do not depend on, instead of raising.

    Returns:
        a tuple with one gradient per input: Tensors (with a graph when ``create_graph``), or None for an
        unused input when ``allow_unused``. No ``.grad`` is changed.
    """
    outputs, inputs = _as_list(outputs, "outputs"), _as_list(inputs, "inputs")
    if grad_outputs is None:
        grad_outputs = [None] * len(outputs)
    elif isinstance(grad_outputs, Tensor) or hasattr(grad_outputs, "shape"):
        grad_outputs = [grad_outputs]
    if len(grad_outputs) != len(outputs):
        raise ValueError(f"grad: {len(outputs)} outputs and {len(grad_outputs)} grad_outputs; give one per output")
    for i, x in enumerate(inputs):
        if not x.requires_grad:
            raise RuntimeError(f"grad: input {i} (shape {x.shape}) does not require grad")
    _check_outputs(outputs)
    seeds = [_seed(o, g, create_graph, f"grad_outputs[{i}]") for i, (o, g) in enumerate(zip(outputs, grad_outputs))]
    walked = _walk(outputs, seeds, targets=inputs, create_graph=create_graph,
                   retain_graph=create_graph if retain_graph is None else retain_graph)
    found = {id(tensor): g for tensor, g in walked}
    result = []
    for i, x in enumerate(inputs):
        g = found.get(id(x))
        if g is None and not allow_unused:
            raise RuntimeError(f"grad: input {i} (shape {x.shape}) was not used to compute the outputs; pass "
                               "allow_unused=True to get None for it")
        result.append(g if g is None or isinstance(g, Tensor) else Tensor(g))
    return tuple(result)


def _as_list(tensors, what):
    tensors = [tensors] if isinstance(tensors, Tensor) else tensors
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(f"grad: {what} must be a Tensor or a list or tuple of Tensors, got {type(tensors).__name__}"
                        + ("" if not isinstance(tensors, (list, tuple)) else
                           f" holding {[type(t).__name__ for t in tensors]}"))
    return list(tensors)


def _check_outputs(outputs):
    for i, o in enumerate(outputs):
        if o._freed:
            raise RuntimeError("backward through a graph that was already freed: the first backward() released "
                               "it; pass retain_graph=True to the first call to go through it twice")
        if not o.requires_grad:
            raise RuntimeError(f"differentiating output {i}, which does not require grad: none of its inputs had "
                               "requires_grad=True (or it was computed under no_grad())")


def _seed(output, g, create_graph, what):
    """The upstream gradient of one output: ones for a one-element output when none is given."""
    if g is None:
        if output.size != 1:
            raise RuntimeError(f"a gradient without {what} needs a one-element output, got shape {output.shape}; "
                               f"pass {what} with the upstream gradient")
        g = Tensor(output.data * 0 + 1) if create_graph else output.data * 0 + 1
    elif isinstance(g, Tensor):
        g = g if create_graph else g.data
    else:
        g = Tensor(_as_array(g, None)) if create_graph else _as_array(g, None)
    if tuple(g.shape) != tuple(output.shape):
        raise ValueError(f"{what} has shape {tuple(g.shape)}, expected {tuple(output.shape)}")
    return g


def _walk(outputs, seeds, targets, retain_graph, create_graph):
    """One reverse pass from ``outputs``; returns [(tensor, gradient)] for the ``targets``, or for the leaves and
    the tensors that called retain_grad() when ``targets`` is None."""
    grads = {}
    for o, g in zip(outputs, seeds):
        grads[id(o)] = g if id(o) not in grads else grads[id(o)] + g
    order = _topological_order(outputs)
    wanted = None if targets is None else {id(t) for t in targets}
    needed = None if targets is None else _leading_to(order, wanted)
    results = []
    with set_grad_enabled(create_graph):
        for node in order:
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if (id(node) in wanted) if wanted is not None else (node._ctx is None or node._retain):
                results.append((node, g))
            fn = node._ctx
            if fn is None or (needed is not None and id(node) not in needed):
                continue
            input_grads = _call_backward(fn, g, create_graph, needed)
            for parent, pg in zip(fn.parents, input_grads):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg
            if not retain_graph:
                node._ctx = None
                node._freed = True
    return results


def _call_backward(fn, g, create_graph, needed):
    """Ask ``fn`` for its inputs' gradients (only those on a path to a wanted tensor, when ``needed``)."""
    saved = fn.needs_input_grad
    if needed is not None:
        fn.needs_input_grad = tuple(w and id(p) in needed for w, p in zip(saved, fn.parents))
    kind = "backward_graph" if create_graph else "backward"
    method = f"{type(fn).__name__}.{kind}"            # for the error messages
    try:
        input_grads = run_with_hooks(fn, "backward", lambda: getattr(fn, kind)(g), g)
    finally:
        fn.needs_input_grad = saved
    if not isinstance(input_grads, tuple) or len(input_grads) != len(fn.parents):
        raise RuntimeError(f"{method} must return a tuple of {len(fn.parents)} gradients (one per input, None "
                           "where not needed)")
    for i, (parent, pg) in enumerate(zip(fn.parents, input_grads)):
        if pg is not None and parent.requires_grad and tuple(pg.shape) != tuple(parent.shape):
            raise RuntimeError(f"{method} returned a gradient of shape {tuple(pg.shape)} for input {i} of "
                               f"shape {parent.shape}")
    return input_grads


def _topological_order(outputs):
    """Tensors that lead to the outputs, each before all of its inputs (iterative, deterministic)."""
    order, visited = [], set()
    stack = [(o, False) for o in reversed(outputs)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        if node._freed:
            raise RuntimeError("backward through a graph that was already freed: an intermediate tensor's "
                               "graph was released by an earlier backward(); use retain_graph=True there")
        stack.append((node, True))
        if node._ctx is not None:
            for parent in reversed(node._ctx.parents):
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    order.reverse()
    return order


def _leading_to(order, wanted):
    """ids of the tensors in ``order`` from which a wanted tensor can be reached (the wanted ones included)."""
    needed = set()
    for node in reversed(order):  # inputs before the tensors made from them
        if id(node) in wanted or (node._ctx is not None and any(id(p) in needed for p in node._ctx.parents)):
            needed.add(id(node))
    return needed


def _accumulate_into(tensor, g):
    """Add ``g`` into ``tensor.grad``: an array, or a Tensor when the gradient carries a graph."""
    if isinstance(g, Tensor):
        if tensor.grad is not None:
            g = (tensor.grad if isinstance(tensor.grad, Tensor) else Tensor(tensor.grad)) + g
        tensor.grad = g
        return
    # A leaf gets its own copy: the same array may be handed to several inputs (x + x, broadcasting views).
    if g.dtype != tensor.dtype:
        g = g.astype(tensor.dtype)
    if isinstance(tensor.grad, Tensor):
        tensor.grad = tensor.grad + Tensor(g)
    else:
        tensor.grad = g.copy() if tensor.grad is None else tensor.grad + g


def hvp(fn, inputs, vectors):
    """The Hessian of a scalar function times vectors, by differentiating the gradient (double backward).

        H v = d/dx (grad f(x) . v)       two backward passes, never the n x n Hessian itself

    Args:
        fn: a function of Tensors returning a one-element Tensor.
        inputs: a Tensor or a sequence of Tensors requiring grad (the point x).
        vectors: one array or Tensor per input, of its shape (the direction v).

    Returns:
        (f(x) as a Tensor, tuple of H v per input, as Tensors without a graph).
    """
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    vectors = (vectors,) if isinstance(vectors, Tensor) or hasattr(vectors, "shape") else tuple(vectors)
    if len(vectors) != len(inputs):
        raise ValueError(f"hvp: {len(inputs)} inputs need as many vectors, got {len(vectors)}")
    for i, (x, v) in enumerate(zip(inputs, vectors)):
        if tuple(v.shape) != tuple(x.shape):
            raise ValueError(f"hvp: vector {i} has shape {tuple(v.shape)}, input {i} has {x.shape}")
    with set_grad_enabled(True):
        value = fn(*inputs)
        grads = grad(value, inputs, create_graph=True, allow_unused=True)
        dot = None
        for g, v in zip(grads, vectors):
            if g is not None:
                term = (g * (v if isinstance(v, Tensor) else Tensor(_as_array(v, g.dtype)))).sum()
                dot = term if dot is None else dot + term
        if dot is None or not dot.requires_grad:
            products = [None] * len(inputs)
        else:
            products = grad(dot, inputs, allow_unused=True)
    zeros = [Tensor(x.data * 0) if h is None else Tensor(h.data) for h, x in zip(products, inputs)]
    return Tensor(value.data), tuple(zeros)
