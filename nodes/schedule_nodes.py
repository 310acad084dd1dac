"""Schedule nodes: a GUIDANCE_SCHEDULE is a guidance_core schedule, evaluated at (step, number of steps)
of the run it drives. Any scale input of this pack accepts one."""

from comfy_api.latest import io

from ..guidance_core import schedules
from .inputs import check_inputs, finite_in_range, public_id

CATEGORY = "sampling/guiders/schedules"
Schedule = io.Custom("GUIDANCE_SCHEDULE")
VALUE_MIN, VALUE_MAX = -100.0, 100.0  # every schedule value widget, and each number of a custom list


def _schedule_output() -> io.Output:
    return Schedule.Output(display_name="schedule",
                           tooltip="Connect to a scale's schedule input (ScheduledCFG, PAG, SEG, SLG, ...). "
                                   "The value at each step is the scale used at that step.")


def _value(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=VALUE_MIN, max=VALUE_MAX, step=0.01, round=0.001,
                          tooltip=tooltip)


class GuidersScheduleConstant(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersScheduleConstant",
            display_name="Guidance Schedule: Constant",
            category=CATEGORY,
            description="The same value at every step.",
            inputs=[_value("value", 7.0, "The scale at every step. CFG: SD1.5 5-8, SDXL 4-7, SD3.5 3.5-5, Flux dev 1 "
                           "(Flux uses its own guidance embedding).")],
            outputs=[_schedule_output()],
        )

    @classmethod
    def execute(cls, value) -> io.NodeOutput:
        check_inputs(cls, value=value)
        return io.NodeOutput(schedules.Constant(value))


class GuidersScheduleLinear(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersScheduleLinear",
            display_name="Guidance Schedule: Linear",
            category=CATEGORY,
            description="A straight line from start_value at the first step to end_value at the last step.",
            inputs=[
                _value("start_value", 7.0, "The scale at the first step."),
                _value("end_value", 1.0, "The scale at the last step. A CFG of exactly 1 skips the uncond pass."),
            ],
            outputs=[_schedule_output()],
        )

    @classmethod
    def execute(cls, start_value, end_value) -> io.NodeOutput:
        check_inputs(cls, start_value=start_value, end_value=end_value)
        return io.NodeOutput(schedules.Linear(start_value, end_value))


class GuidersScheduleCosine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersScheduleCosine",
            display_name="Guidance Schedule: Cosine",
            category=CATEGORY,
            description="Cosine schedule with warmup, cycles and k-decay, value for value as cf_guidance's "
                        "get_cos_sched (warmup steps = int(warmup × steps)).",
            inputs=[
                _value("max_value", 7.5, "The peak of the cosine (reached after the warmup)."),
                _value("min_value", 0.15, "The trough of the cosine. For CFG, values near 1 fade guidance out; "
                                         "the cf_guidance default 0.15 is for T-Norm style small scales."),
                io.Float.Input("num_cycles", default=0.5, min=0.0, max=20.0, step=0.05,
                               tooltip="Cosine cycles over the run: 0.5 is one decay from max to min, 1 goes down and "
                                       "back up."),
                io.Float.Input("warmup", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps spent rising linearly from warmup_init to max_value."),
                _value("warmup_init", 0.0, "The value at the first warmup step."),
                io.Float.Input("k_decay", default=1.0, min=0.01, max=10.0, step=0.05,
                               tooltip="Progress exponent (k-decay, Zhang et al. 2020): above 1 the value stays high "
                                       "longer, below 1 it falls sooner."),
            ],
            outputs=[_schedule_output()],
        )

    @classmethod
    def execute(cls, max_value, min_value, num_cycles, warmup, warmup_init, k_decay) -> io.NodeOutput:
        check_inputs(cls, max_value=max_value, min_value=min_value, num_cycles=num_cycles, warmup=warmup,
                     warmup_init=warmup_init, k_decay=k_decay)
        return io.NodeOutput(schedules.Cosine(max_value, min_value, num_cycles, warmup, warmup_init, k_decay))


class GuidersScheduleCustom(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersScheduleCustom",
            display_name="Guidance Schedule: Custom",
            category=CATEGORY,
            description="Your own list of values, resampled (linear interpolation) to the run's number of steps; "
                        "a list exactly as long as the steps is used as is.",
            inputs=[
                io.String.Input("values", default="7.5, 6, 4, 3", multiline=True,
                                tooltip="Numbers separated by commas, spaces or new lines, first step first; "
                                        f"each from {VALUE_MIN:g} to {VALUE_MAX:g}."),
            ],
            outputs=[_schedule_output()],
        )

    @classmethod
    def custom_values(cls, values) -> tuple[float, ...]:
        """The typed numbers, each within the range of the other schedules' value widgets: a value such as 1e300
        is finite, but as a scale it overflows the guided prediction to inf."""
        check_inputs(cls, values=values)
        try:
            numbers = schedules.parse_values(values)
        except ValueError as error:
            raise ValueError(f"{public_id(cls)}: values: {error}") from None
        for index, number in enumerate(numbers, start=1):
            finite_in_range(public_id(cls), f"values: value #{index}", number, VALUE_MIN, VALUE_MAX)
        return numbers

    @classmethod
    def validate_inputs(cls, values=None):
        if values is None:  # linked: ComfyUI validates before the source has run; execute checks it then
            return True
        try:
            cls.custom_values(values)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, values) -> io.NodeOutput:
        return io.NodeOutput(schedules.Custom(cls.custom_values(values)))


NODES = [GuidersScheduleConstant, GuidersScheduleLinear, GuidersScheduleCosine, GuidersScheduleCustom]

# The node whose widgets a schedule kind of guidance_core comes from (the kind the curve preview sends).
NODE_OF_KIND = {"constant": GuidersScheduleConstant, "linear": GuidersScheduleLinear,
                "cosine": GuidersScheduleCosine, "custom": GuidersScheduleCustom}
