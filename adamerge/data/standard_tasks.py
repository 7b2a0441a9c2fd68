"""The eight standard vision-merging tasks (class names and templates). Filled in by the models issue."""
