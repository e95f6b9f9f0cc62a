"""The local cluster: a real control plane built from Go modules, with kwok nodes."""
