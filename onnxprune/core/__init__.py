"""The ground floor: helpers every stage may use (tensors, graphs, progress, QDQ views); imports no
stage."""
