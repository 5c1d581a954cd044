"""Solutions to lesson 2."""


def topological_order(root):
    """root Tensor -> list of Tensors, root first, every tensor before its inputs."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            if node._ctx is not None:
                stack.extend((p, False) for p in node._ctx.parents if p.requires_grad)
    return order[::-1]


def sigmoid_backward(y, dy):
    """y = sigmoid(x), dy = dL/dy -> dL/dx"""
    return dy * y * (1 - y)
