"""Export to ONNX Runtime GenAI: `auto-opt` (one model) and `generate-adapter` (one base, many adapters)."""
