"""The demo model that ships with idefix, and the tools that build it."""
