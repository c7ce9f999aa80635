"""`llavarun local`: a LlavaRun's stages as processes on this machine."""
