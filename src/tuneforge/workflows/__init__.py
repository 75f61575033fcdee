"""Floor 3: workflows of many runs — compare, cross-validate, reproduce, the demo."""
