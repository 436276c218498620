"""Pure numerical solvers the methods share: no state, no files, no knowledge of dictionaries or stores.

nnls: batched non-negative least squares (the code step of every NNLS-based method).
kmeans: k-means++ seeding (first dictionaries, concept clustering).
lowrank: leading eigenvectors and rank-k energy by randomized subspace iteration.
"""
