"""What the backend modules share."""

SECOND_ORDER_REFUSED = (
    'DEQLayer(gradient="implicit") gives first-order gradients only; '
    "a gradient of its gradient (a Hessian-vector product, a "
    "gradient penalty on the inputs) is not computed. Use "
    'gradient="unrolled" (backpropagation through the iterations, '
    'exact for that computation) or gradient="phantom" (exact '
    "derivatives of its damped steps from a fixed z*)."
)
