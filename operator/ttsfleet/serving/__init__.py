"""The TTS engine the Triton models run: request checks, text normalisation, synthesis."""
