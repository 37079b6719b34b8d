from twisted.application.service import ServiceMaker

mixingest = ServiceMaker(
    "mixingest",
    "mixingest.tap",
    "Mixpanel-compatible event ingestion onto durable queues",
    "mixingest",
)
