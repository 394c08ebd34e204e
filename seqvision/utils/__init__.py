"""What every other package uses and that knows nothing of models or training: the one atomic file
writer (:mod:`seqvision.utils.io`) and the one set of argument checks (:mod:`seqvision.utils.checks`).

Nothing here imports from another seqvision package.
"""
