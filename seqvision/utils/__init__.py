"""What every other package uses and that knows nothing of models or training: the one atomic file
writer (:mod:`seqvision.utils.io`), the one set of argument checks (:mod:`seqvision.utils.checks`),
optional extras (:mod:`seqvision.utils.extras`) and the machine's name (:mod:`seqvision.utils.machine`).

Nothing here imports from another seqvision package.
"""
