"""llavarun operator: LlavaRun API, plan, render and the kopf adapter."""
