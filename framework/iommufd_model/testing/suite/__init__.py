"""The shipped contract tests; collected by the kit when a driver is selected."""
