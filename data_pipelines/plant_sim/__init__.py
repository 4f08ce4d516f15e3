"""plant_sim: the synthetic "true plant" of the CDC line, writing realistic historian exports.

Data flow, one function per arrow: validate_sim_config -> design_campaign (RunSpecs) ->
simulate_runs (Truth, the true trajectories at 1 s) -> measure_run (instruments, PAT,
historian artefacts) -> the files of docs/data_contracts.md section 1;
write_historian_export chains them for `twin generate`. numpy, pandas and pyarrow only; no
code is shared with hybrid_twin (DESIGN.md: the plant is not the model).
"""

from data_pipelines.plant_sim.blender import blender_impulse_response as blender_impulse_response
from data_pipelines.plant_sim.blender import steady_holdup_kg as steady_holdup_kg
from data_pipelines.plant_sim.config import validate_sim_config as validate_sim_config
from data_pipelines.plant_sim.design import RunSpec as RunSpec
from data_pipelines.plant_sim.design import SetpointStep as SetpointStep
from data_pipelines.plant_sim.design import design_campaign as design_campaign
from data_pipelines.plant_sim.export import historian_table as historian_table
from data_pipelines.plant_sim.export import write_historian_export as write_historian_export
from data_pipelines.plant_sim.faults import FAULT_KINDS as FAULT_KINDS
from data_pipelines.plant_sim.faults import FaultSpec as FaultSpec
from data_pipelines.plant_sim.sensors import QUALITIES as QUALITIES
from data_pipelines.plant_sim.sensors import TAG_SOURCES as TAG_SOURCES
from data_pipelines.plant_sim.sensors import measure_run as measure_run
from data_pipelines.plant_sim.simulate import SIGNALS as SIGNALS
from data_pipelines.plant_sim.simulate import Truth as Truth
from data_pipelines.plant_sim.simulate import simulate_run as simulate_run
from data_pipelines.plant_sim.simulate import simulate_runs as simulate_runs
