"""The stages of :func:`mtl_opt.mtl_backward`, one module each.

* :mod:`~mtl_opt._backward.inputs`: the arguments, checked, and the heads found on the graph;
* :mod:`~mtl_opt._backward.graph`: walks of the autograd graph;
* :mod:`~mtl_opt._backward.jacobian`: the Jacobian blocks, batched or per task;
* :mod:`~mtl_opt._backward.weights`: the Gramian of the blocks and the aggregator's weights;
* :mod:`~mtl_opt._backward.update`: the updates into ``.grad`` and the result;
* :mod:`~mtl_opt._backward.result`: :class:`MTLBackwardResult`.
"""
