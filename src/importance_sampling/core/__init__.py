"""The paper's method, with nothing but torch: usable in any training loop.

sampling.py    the maths: probabilities, resampling, weights, tau and its switch
scores.py      per-sample scores from a forward pass: loss, upper bound
grad_norms.py  exact per-sample gradient norms from one ordinary backward (module hooks)
samplers.py    which points to load and which to train on (uniform, loss, upper bound, gradient norm)
baselines.py   online batch selection, history, selective backprop, InfoBatch
order.py       seeded per-epoch permutations, sharded over data-parallel ranks
collectives.py the data-parallel ranks and the few collectives the samplers need
variance.py    the exact variance of every sampler's gradient estimator
"""
