"""New per-node constants: what a rewrite uses to change one node's constant input."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class NodeConstants:
    """New constants for one node's inputs, uniquely named.

    Exporters share constants (shape vectors, biases) between nodes, so a changed one is a new
    initializer for the node that needs it, never an edit of the shared one.
    """

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.count = 0

    def replace(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        while True:
            self.count += 1
            name = f"{node.name or node.op_type}_pruned_{index}_{self.count}"
            if name not in self.graph.initializers:
                break
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        )
        value.const_value = ir.Tensor(array, name=name)
        self.graph.register_initializer(value)
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        old = node.inputs[index]
        node.replace_input_with(index, value)
        if old is None or old.uses() or old.is_graph_input() or old.is_graph_output():
            return
        # orphaned by this replacement: drop it, stored as an initializer or a Constant node
        producer = old.producer()
        if old.name in self.graph.initializers and producer is None:
            self.graph.initializers.pop(old.name)
        elif (
            producer is not None and producer.op_type == "Constant" and producer.graph is self.graph
        ):
            self.graph.remove(producer, safe=True)
