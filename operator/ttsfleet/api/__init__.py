"""The `TtsDeployment` API: typed models, the one source of the CRD."""
