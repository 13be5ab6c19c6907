"""Float32 arithmetic as PyTorch's CPU kernels round it, where XLA would not."""
import jax
import jax.numpy as jnp


def exact_div(a, b):
  """a / b with IEEE rounding under XLA (whose CPU backend turns a division by a
  broadcast or constant divisor into a multiply by its rounded reciprocal, 1 ulp off
  for ~15 % of quotients): the divisor is materialised at full shape behind an
  optimization barrier. Shapes broadcast as for `a / b`."""
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
  b = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, jnp.result_type(a, b)), shape))
  return a / b


def after(x, g):
  """x, made to depend on the cotangent g: x + min(|g[0]|, 0), which is x (up to the sign of
  zeros) for a finite g. For custom backward rules that recompute a forward op (a pad, a
  gather) on a saved input: XLA merges (CSE) identical ops, which would keep the forward's
  result alive from the forward until the backward (XLA:CPU drops optimization barriers
  before CSE). x [...] any shape, g [...] -> x's shape and dtype."""
  return x + jnp.minimum(jnp.abs(jnp.ravel(g)[0]), 0).astype(x.dtype)


def materialize(y):
  """y, computed once into a buffer of its own: y / 1 with the 1 behind an optimization
  barrier, so that XLA neither folds the division nor (rating a division by a non-constant
  expensive) copies y's producer into each of its consumers. XLA:CPU duplicates a cheap
  elementwise producer (a depthwise conv's k*k multiply-adds) into every loop that reads
  it: the forward, the activation's backward masks, each view a matmul reads; or leaves it
  to a backward loop, keeping its inputs alive until then. Exact (y / 1 = y for every float
  and integer); any shape, float or integer dtype."""
  one = jax.lax.optimization_barrier(jnp.ones(jnp.shape(y), y.dtype))
  return jax.lax.div(y, one)
