"""The Python API (mistralrs-style): import its names from `idefix` itself, e.g.
`from idefix import Runner, Which, ChatCompletionRequest, VisionArchitecture`.

Modules: `options` (Which, enums), `types` (request and response objects), `messages` (VisionMessages),
`runner` (Runner), `builder` (VisionModelBuilder, VisionModel), `responses` (engine outputs -> responses).
"""
